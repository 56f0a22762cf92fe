"""Images to features: ``dpfc extract`` and :func:`extract`.

The method trains only the last layer on features of a frozen, publicly pre-trained
model. This module runs that model over an image folder and writes the features in the
formats ``dpfc train`` reads, recording which model, which weights file (SHA-256) and
which preprocessing produced them.

Inputs
------
* A folder with one sub-folder per class (``root/cat/001.jpg``, ``root/dog/7.png``);
  the class names are the sub-folder names, sorted, and label ``i`` is ``classes[i]``.
* Or a CSV file of ``path,label`` rows (an optional header ``path,label``); relative
  paths are relative to the CSV's folder (or to ``root``). Labels are class names;
  the label set is ``classes`` when given, else the sorted distinct labels (numerically
  when they are all integers).

Models (never downloaded: the user gives a local file)
------------------------------------------------------
``model.onnx`` (backend ``onnx``, the tested default; ``pip install "dpfc-native[extract]"``)
    An exported feature extractor: input ``(N, 3, H, W)`` float32, first output
    ``(N, D)`` (or ``(N, D, 1, 1)``, flattened). Runs on ONNX Runtime's CPU provider,
    or CUDA when ``device="cuda"``/``"auto"`` and the ``onnxruntime-gpu`` build is
    installed. The preprocessing comes from, in order: the ``preprocess`` argument, a
    sidecar ``model.onnx.json`` / ``model.preprocess.json``, the model's metadata entry
    ``dpfc_preprocess`` (JSON), else the ImageNet convention for the model's input size
    (resize the shorter side to ``crop / 0.875``, centre crop, ImageNet mean and std),
    which is then marked as a guess in the record.
``timm:NAME`` with ``weights=FILE`` (backend ``timm``; needs ``torch`` and ``timm``,
    the ``[timm]`` extra)
    ``timm.create_model(NAME, pretrained=False, num_classes=0)`` loads the local
    checkpoint (``.pth``/``.pt``/``.bin`` state dict or ``.safetensors``); the
    preprocessing is timm's own ``resolve_data_config`` for that model (input size,
    ``crop_pct``, interpolation, mean, std). A file that the library's cache already
    holds (e.g. under ``~/.cache/huggingface``) is passed the same way, by its path.

Outputs
-------
``out.npz`` (arrays ``features``, ``labels``, ``metadata``), or paired ``.npy``
(``out.features.npy`` + ``out.labels.npy``), either one file or shards of
``shard_size`` rows (``out-00000.npz``, ...), and always a manifest ``out.json``: the
model, its SHA-256, the weights file and its SHA-256, the preprocessing spec, the class
names in label order, the shards and the images skipped. Features are float32. Rows
stream to disk shard by shard, so memory does not grow with the data set.

Privacy: extraction is per-example and uses a public model, so it spends no budget; the
output is as private as the images (and so are the manifest's skipped-image paths).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ._fileio import open_regular
from ._optional import require
from .data import _sibling_labels_path

__all__ = [
    "Preprocess",
    "ExtractResult",
    "ExtractError",
    "IMAGE_EXTENSIONS",
    "extract",
    "list_images",
    "load_model",
    "sha256_file",
    "register_cli",
]

#: File name endings read as images in the class-per-subfolder layout (case-insensitive).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's and timm's default centre-crop fraction for ImageNet models.
DEFAULT_CROP_PCT = 0.875

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


class ExtractError(ValueError):
    """Bad input to the extractor (unreadable image, missing model, bad layout)."""


class _NoPreprocess(ExtractError):
    """The model carries no preprocessing spec (no sidecar, no metadata) and its input
    shape does not fix one: arguments must give it."""


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #
_CROP_MODES = ("center", "squash", "border")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (recorded with the features).

    RGB conversion, resize, crop to ``crop`` (height, width), scaling to [0, 1],
    per-channel ``(x - mean) / std``, layout ``(3, H, W)`` float32: the steps of
    torchvision's / timm's evaluation transforms, which resize PIL images with PIL, as
    here. The resize and crop follow ``crop_mode`` (timm's names):

    * ``"center"``: aspect ratio kept. An int ``resize`` scales the shorter side to it
      (torchvision's ``Resize(int)``); a pair ``(H, W)`` scales the image so that it
      covers that size (timm's ``ResizeKeepRatio``); then a centre crop (zero padding
      where the image is smaller).
    * ``"squash"``: resized to exactly ``resize`` (a pair, or ``(r, r)``), aspect ratio
      not kept, then a centre crop.
    * ``"border"``: aspect ratio kept, the image fitted inside ``resize``, then centre
      cropped or padded to ``crop`` with the mean colour.

    Without ``crop_mode``: ``"squash"`` when ``resize`` is a pair, else ``"center"``.

    Attributes
    ----------
    resize : int or (int, int)
    crop : (int, int)
    mean, std : (float, float, float)
    interpolation : str
        PIL filter: nearest, bilinear, bicubic, lanczos, box or hamming.
    source : str
        Where the spec came from (argument, sidecar file, model metadata, timm, or a
        guess from the input size).
    crop_mode : {"center", "squash", "border"}
    """

    resize: object
    crop: tuple
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"
    source: str = "argument"
    crop_mode: Optional[str] = None

    def __post_init__(self):
        def size(value, key):
            v = (int(value), int(value)) if isinstance(value, (int, np.integer)) else value
            if (
                not isinstance(v, (list, tuple))
                or len(v) != 2
                or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in v)
            ):
                raise ExtractError(
                    f"preprocessing '{key}' must be a positive int or [H, W], got {value!r}"
                )
            return tuple(int(c) for c in v)

        crop = size(self.crop, "crop")
        resize = size(self.resize, "resize")
        if not isinstance(self.resize, (list, tuple)):
            resize = resize[0]
        vectors = []
        for key in ("mean", "std"):
            v = getattr(self, key)
            ok = isinstance(v, (list, tuple)) and len(v) == 3
            ok = ok and all(isinstance(c, (int, float)) and math.isfinite(c) for c in v)
            if not ok or (key == "std" and not all(c > 0 for c in v)):
                need = "3 finite numbers" + (" > 0" if key == "std" else "")
                raise ExtractError(f"preprocessing '{key}' must be {need}, got {v!r}")
            vectors.append(tuple(float(c) for c in v))
        if self.interpolation not in _INTERPOLATIONS:
            raise ExtractError(
                f"preprocessing 'interpolation' must be one of {_INTERPOLATIONS}, "
                f"got {self.interpolation!r}"
            )
        mode = self.crop_mode
        if mode is None:
            mode = "squash" if isinstance(resize, tuple) else "center"
        if mode not in _CROP_MODES:
            raise ExtractError(
                f"preprocessing 'crop_mode' must be one of {_CROP_MODES}, got {mode!r}"
            )
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "mean", vectors[0])
        object.__setattr__(self, "std", vectors[1])
        object.__setattr__(self, "crop_mode", mode)

    @classmethod
    def from_dict(cls, spec: dict, source: str) -> "Preprocess":
        """Build from a dict with keys ``resize``, ``crop`` (or ``input_size``),
        ``mean``, ``std``, ``interpolation``, ``crop_mode`` (``crop_pct`` derives
        ``resize``: ``floor(crop / crop_pct)``, each side of a non-square crop). Errors
        name ``source``."""
        if not isinstance(spec, dict):
            raise ExtractError(f"preprocessing must be a JSON object ({source})")
        spec = dict(spec)
        unknown = set(spec) - {
            "resize",
            "crop",
            "input_size",
            "crop_pct",
            "crop_mode",
            "mean",
            "std",
            "interpolation",
            "source",
        }
        if unknown:
            raise ExtractError(f"unknown preprocessing keys {sorted(unknown)} ({source})")
        crop = spec.get("crop", spec.get("input_size"))
        if crop is None:
            raise ExtractError(f"preprocessing needs 'crop' (the input size) ({source})")
        if isinstance(crop, (list, tuple)) and len(crop) == 3:  # (C, H, W)
            crop = crop[1:]
        resize = spec.get("resize")
        mode = spec.get("crop_mode")
        try:
            if resize is None:
                pct = spec.get("crop_pct", DEFAULT_CROP_PCT)
                if not isinstance(pct, (int, float)) or not 0 < pct <= 4:
                    raise ExtractError(
                        f"preprocessing 'crop_pct' must be a number in (0, 4], got {pct!r}"
                    )
                resize = _resize_for(crop, float(pct))
                mode = mode or "center"  # timm's default for a resize derived from crop_pct
            return cls(
                resize=resize,
                crop=crop,
                mean=spec.get("mean", IMAGENET_MEAN),
                std=spec.get("std", IMAGENET_STD),
                interpolation=spec.get("interpolation", "bilinear"),
                source=source,
                crop_mode=mode,
            )
        except ExtractError as exc:
            raise ExtractError(f"{exc} ({source})") from None
        except (TypeError, ValueError) as exc:
            raise ExtractError(f"bad preprocessing ({source}): {exc}") from None

    def to_dict(self) -> dict:
        return {
            "resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
            "crop": list(self.crop),
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "source": self.source,
            "steps": "RGB; resize; center crop; /255; (x - mean) / std; CHW float32",
        }

    def _resized_size(self, w: int, h: int) -> tuple:
        """The (width, height) the image is resized to."""
        if self.crop_mode == "squash":
            rh, rw = self.resize if isinstance(self.resize, tuple) else (self.resize,) * 2
            return rw, rh
        if self.crop_mode == "center" and not isinstance(self.resize, tuple):
            # Shorter side to `resize`, the other scaled and truncated (torchvision's rule).
            s = self.resize
            return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        # Aspect kept against a target (H, W): covering it ("center") or inside it
        # ("border"), each side rounded (timm's ResizeKeepRatio).
        th, tw = self.resize if isinstance(self.resize, tuple) else (self.resize,) * 2
        ratios = (h / th, w / tw)
        ratio = max(ratios) if self.crop_mode == "border" else min(ratios)
        return round(w / ratio), round(h / ratio)

    def __call__(self, image) -> np.ndarray:
        """A PIL image -> ``(3, H, W)`` float32 array."""
        from PIL import Image

        resample = getattr(Image.Resampling, self.interpolation.upper())
        img = image.convert("RGB")
        w, h = img.size
        size = self._resized_size(w, h)
        if size != (w, h):
            img = img.resize(size, resample)
        w, h = img.size
        ch, cw = self.crop
        if ch > h or cw > w:  # pad like torchvision's CenterCrop (zeros) or timm's border
            fill = tuple(round(255 * m) for m in self.mean) if self.crop_mode == "border" else 0
            padded = Image.new("RGB", (max(w, cw), max(h, ch)), fill)
            padded.paste(img, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
            img = padded
            w, h = img.size
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
        x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def _resize_for(crop, crop_pct: float):
    if isinstance(crop, (list, tuple)):
        h, w = (int(c) for c in crop)
        if h != w:
            return (int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct)))
        crop = h
    return int(math.floor(int(crop) / crop_pct))


# --------------------------------------------------------------------------- #
# Image lists
# --------------------------------------------------------------------------- #
def _label_order(labels: Sequence[str]) -> list:
    distinct = sorted(set(labels))
    try:
        return sorted(distinct, key=lambda s: int(s))
    except ValueError:
        return distinct


def list_images(source, root=None, classes: Optional[Sequence[str]] = None):
    """The (paths, label names, classes) of a class-per-subfolder folder or a CSV.

    Parameters
    ----------
    source : path
        A folder (one sub-folder per class) or a ``.csv`` file of ``path,label`` rows.
    root : path, optional
        For a CSV: the folder its relative paths start from (default the CSV's folder).
    classes : sequence of str, optional
        The public label set, in label order. Default: the sub-folder names (sorted), or
        the CSV's distinct labels (sorted; numerically when all are integers).

    Returns
    -------
    paths : list of str
    labels : numpy.ndarray (n,) int64, indices into ``classes``
    classes : list of str
    """
    source = Path(source)
    if not source.exists():
        raise ExtractError(f"image source not found: {source}")
    if source.is_dir():
        names = sorted(
            p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not names:
            raise ExtractError(
                f"{source} has no class sub-folders (expected "
                f"{source}/<class>/<image>, or pass a CSV of path,label)"
            )
        paths, names_of = [], []
        for name in names:
            seen = set()  # symlinked folders are followed (as torchvision does), once each
            for dirpath, dirnames, files in os.walk(source / name, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(files):
                    if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        names_of.append(name)
        found = names
    else:
        base = Path(root) if root is not None else source.parent
        paths, names_of = [], []
        try:
            # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the header.
            with open(source, newline="", encoding="utf-8-sig") as f:
                first = True
                for i, row in enumerate(csv.reader(f)):
                    if not row or not "".join(row).strip():
                        continue
                    header, first = first, False
                    if len(row) != 2:
                        raise ExtractError(
                            f"{source} line {i + 1}: expected 'path,label', got {len(row)} field(s)"
                        )
                    path, label = row[0].strip(), row[1].strip()
                    if header and (path.lower(), label.lower()) == ("path", "label"):
                        continue
                    paths.append(path if os.path.isabs(path) else os.fspath(base / path))
                    names_of.append(label)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ExtractError(f"cannot read {source}: {exc}") from exc
        found = _label_order(names_of)
    if not paths:
        raise ExtractError(
            f"no images found in {source} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    if classes is None:
        classes = list(found)
    else:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ExtractError("classes has duplicate names")
        unknown = sorted(set(names_of) - set(classes))
        if unknown:
            raise ExtractError(
                f"labels not in classes: {unknown[:5]} (classes: "
                f"{classes[:10]}{' ...' if len(classes) > 10 else ''})"
            )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names_of], dtype=np.int64)
    return paths, labels, classes


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries' messages run long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _with_labels_file(path: str) -> list:
    """A data file and, for a paired ``.features.npy``, its ``.labels.npy``."""
    labels = _sibling_labels_path(path)
    return [path] if labels is None else [path, labels]


def _onnx_external_files(path: str) -> Optional[list]:
    """The external-data files an ONNX model's tensors point to (sorted, as paths beside
    the model), [] for none, or None when the ``onnx`` package is not installed to say."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ExtractError(f"cannot read ONNX model {path}: {exc}") from exc
    base = os.path.dirname(os.path.abspath(path))
    names = set()

    def visit(graph):
        for t in list(graph.initializer) + [
            a.t for n in graph.node for a in n.attribute if a.HasField("t")
        ]:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                names.update(e.value for e in t.external_data if e.key == "location")
        for n in graph.node:
            for a in n.attribute:
                if a.HasField("g"):
                    visit(a.g)
                for g in a.graphs:
                    visit(g)

    visit(model.graph)
    return sorted(os.path.join(base, name) for name in names)


def _onnx_weights_record(path: str, model_sha256: str) -> dict:
    """The weights entry of the record: the model file's SHA-256, and every external-data
    file's (models over 2 GB, and torch's default export, keep tensors outside the
    .onnx); ``sha256`` covers all of them."""
    files = _onnx_external_files(path)
    record = {"path": os.path.abspath(path), "model_sha256": model_sha256}
    if files is None:
        record["sha256"] = model_sha256
        record["note"] = (
            "the .onnx file only: install the onnx package to hash external-data files too"
        )
        return record
    if not files:
        record["sha256"] = model_sha256
        record["note"] = "weights embedded in the ONNX file"
        return record
    h = hashlib.sha256(model_sha256.encode())
    external = []
    for f in files:
        if not os.path.isfile(f):
            raise ExtractError(f"{path}: its external data file {f} is missing")
        digest = sha256_file(f)
        external.append({"path": f, "sha256": digest})
        h.update(os.path.basename(f).encode() + b"\0" + digest.encode())
    record["external_data"] = external
    record["sha256"] = h.hexdigest()
    record["note"] = "SHA-256 over the model file's and its external-data files' hashes"
    return record


class _OnnxModel:
    backend = "onnx"

    def __init__(self, path: str, device: str, output_name: Optional[str], threads: int):
        ort = require("onnxruntime", "ONNX models", "extract")
        available = ort.get_available_providers()
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ExtractError(
                    "device='cuda' needs onnxruntime's CUDA provider (pip "
                    "install onnxruntime-gpu); available providers: "
                    f"{available}"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExtractError(f"cannot load ONNX model {path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExtractError(
                f"{path}: expected one input (N, 3, H, W), found {[i.name for i in inputs]}"
            )
        self.input = inputs[0]
        outputs = [o.name for o in self.session.get_outputs()]
        if output_name is None:
            output_name = outputs[0]
        elif output_name not in outputs:
            raise ExtractError(f"{path} has no output {output_name!r} (outputs: {outputs})")
        self.output = output_name
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.path = path
        self.info = {
            "backend": "onnx",
            "path": os.path.abspath(path),
            "name": os.path.basename(path),
            "sha256": sha256_file(path),
            "input": self.input.name,
            "output": self.output,
            "providers": self.providers,
        }
        self.weights = _onnx_weights_record(path, self.info["sha256"])

    def default_preprocess(self) -> Preprocess:
        for sidecar in (self.path + ".json", os.path.splitext(self.path)[0] + ".preprocess.json"):
            if os.path.isfile(sidecar):
                try:
                    with open(sidecar) as f:
                        spec = json.load(f)
                except (OSError, ValueError) as exc:
                    raise ExtractError(f"cannot read preprocessing file {sidecar}: {exc}") from exc
                return Preprocess.from_dict(spec, f"sidecar file {sidecar}")
        meta = self.session.get_modelmeta().custom_metadata_map
        if "dpfc_preprocess" in meta:
            try:
                spec = json.loads(meta["dpfc_preprocess"])
            except ValueError as exc:
                raise ExtractError(f"{self.path}: bad dpfc_preprocess metadata: {exc}") from exc
            return Preprocess.from_dict(spec, "model metadata 'dpfc_preprocess'")
        shape = self.input.shape
        if len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]):
            raise _NoPreprocess(
                f"{self.path}: the input shape {shape} does not fix the image "
                "size and the model carries no preprocessing: pass it "
                "(--crop/--resize, or a sidecar <model>.onnx.json)"
            )
        crop = (int(shape[2]), int(shape[3]))
        return Preprocess(
            resize=_resize_for(crop, DEFAULT_CROP_PCT),
            crop=crop,
            source="GUESSED: ImageNet convention for the model's input size "
            "(the model carries no preprocessing)",
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        fixed = self.input.shape[0] if self.input.shape else None
        if isinstance(fixed, int) and fixed >= 1 and batch.shape[0] != fixed:
            # A model exported with a fixed batch size: run it in batches of exactly that
            # size, the last one padded with zero images whose rows are dropped.
            parts = []
            for a in range(0, batch.shape[0], fixed):
                part = batch[a : a + fixed]
                m = part.shape[0]
                if m < fixed:
                    pad = np.zeros((fixed - m,) + part.shape[1:], dtype=part.dtype)
                    part = np.concatenate([part, pad])
                parts.append(self(part)[:m])
            return np.concatenate(parts)
        try:
            out = self.session.run([self.output], {self.input.name: batch})[0]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExtractError(
                f"{self.path} refused a batch of shape {tuple(batch.shape)} (its input is "
                f"{self.input.shape}): {_first_line(exc)}. The image size and channels must match "
                "the model's input (--crop, --resize, or a sidecar <model>.onnx.json)"
            ) from exc
        return np.asarray(out)


class _TimmModel:
    backend = "timm"

    def __init__(self, name: str, weights: Optional[str], device: str):
        try:
            timm = require("timm", "timm models", "timm")
            torch = require("torch", "timm models", "timm")
        except ImportError as exc:
            raise type(exc)(f"{exc}; or export the model to ONNX") from exc
        if not os.path.isfile(weights):
            raise ExtractError(f"weights file not found: {weights}")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception as exc:  # timm raises RuntimeError for unknown names
            raise ExtractError(f"timm cannot build {name!r}: {exc}") from exc
        try:
            if weights.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(weights)
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            # torch's message for a pickle holding Python objects is many lines advising
            # weights_only=False, which is never done here: one line instead.
            import pickle

            if isinstance(exc, pickle.UnpicklingError):
                detail = "it holds Python objects, which are never unpickled here"
            else:
                detail = _first_line(exc)
            raise ExtractError(
                f"cannot read weights {weights}: not a tensor checkpoint that loads without "
                f"running code (.safetensors, or a state dict saved by torch.save): {detail}"
            ) from exc
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
        if not isinstance(state, dict):
            raise ExtractError(f"{weights} holds no state dict (a {type(state).__name__})")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of the wrong shape (strict=False allows none)
            raise ExtractError(f"{weights} does not fit timm:{name}: {exc}") from exc
        if missing:
            raise ExtractError(f"{weights} does not fit timm:{name}: missing {missing[:5]}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ExtractError("device='cuda' but torch sees no CUDA device")
        self.torch = torch
        self.device = device
        self.model = model.eval().to(device)
        cfg = timm.data.resolve_data_config({}, model=model)
        self.cfg = cfg
        self.info = {
            "backend": "timm",
            "name": name,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "ignored_checkpoint_keys": list(unexpected)[:20],
        }
        self.weights = {"path": os.path.abspath(weights), "sha256": sha256_file(weights)}

    def default_preprocess(self) -> Preprocess:
        cfg = self.cfg
        return Preprocess.from_dict(
            {
                "input_size": list(cfg["input_size"]),
                "crop_pct": cfg.get("crop_pct", DEFAULT_CROP_PCT),
                "mean": list(cfg["mean"]),
                "std": list(cfg["std"]),
                "interpolation": cfg.get("interpolation", "bilinear"),
                "crop_mode": cfg.get("crop_mode") or "center",
            },
            "timm resolve_data_config",
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()


def load_model(
    model: str,
    weights: Optional[str] = None,
    device: str = "auto",
    output_name: Optional[str] = None,
    threads: int = 0,
):
    """A feature extractor for ``model``: a ``.onnx`` file, or ``timm:NAME`` + weights."""
    if device not in ("auto", "cpu", "cuda"):
        raise ExtractError(f"device must be auto, cpu or cuda, got {device!r}")
    model = os.fspath(model)
    if model.startswith("timm:"):
        if weights is None:
            raise ExtractError(
                f"{model} needs a local weights file (--weights PATH): "
                "dpfc_native never downloads weights"
            )
        return _TimmModel(
            model[len("timm:") :], None if weights is None else os.fspath(weights), device
        )
    if not os.path.isfile(model):
        raise ExtractError(
            f"model file not found: {model} (dpfc_native never downloads "
            "models: export one to ONNX, or use timm:NAME --weights FILE)"
        )
    if not model.lower().endswith(".onnx"):
        raise ExtractError(f"unknown model format: {model} (expected a .onnx file or timm:NAME)")
    if weights is not None:
        raise ExtractError("--weights is for timm models; an ONNX file holds its weights")
    return _OnnxModel(model, device, output_name, threads)


# --------------------------------------------------------------------------- #
# Shard writer
# --------------------------------------------------------------------------- #
class _ShardWriter:
    """Rows stream to a raw temporary file per shard; a full shard is written out in the
    target format (``.npz`` from a memory map, ``.npy`` as header + copied rows)."""

    def __init__(self, output: str, fmt: str, shard_size: Optional[int], metadata: dict):
        self.stem, self.fmt, self.shard_size = output, fmt, shard_size
        self.metadata = metadata
        self.files: list = []
        self.d = None
        self._tmp = None
        self._labels: list = []
        self._rows = 0

    def _open(self):
        directory = os.path.dirname(os.path.abspath(self.stem))
        self._tmp = tempfile.NamedTemporaryFile(
            dir=directory, prefix=".dpfc-extract-", delete=False
        )
        self._rows, self._labels = 0, []

    def add(self, feats: np.ndarray, labels: np.ndarray):
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if self.d is None:
            self.d = feats.shape[1]
        pos = 0
        while pos < feats.shape[0]:
            if self._tmp is None:
                self._open()
            take = feats.shape[0] - pos
            if self.shard_size is not None:
                take = min(take, self.shard_size - self._rows)
            self._tmp.write(feats[pos : pos + take].tobytes())
            self._labels.append(labels[pos : pos + take])
            self._rows += take
            pos += take
            if self.shard_size is not None and self._rows == self.shard_size:
                self._flush()

    def _name(self, index: Optional[int]) -> str:
        stem = self.stem if index is None else f"{self.stem}-{index:05d}"
        return stem + (".npz" if self.fmt == "npz" else ".features.npy")

    @staticmethod
    def _partial(path: str) -> str:
        """Where a file is written before the run succeeds: beside its final name, hidden,
        so an earlier run's output stays intact until :meth:`commit`."""
        head, tail = os.path.split(path)
        return os.path.join(head, f".{tail}.dpfc-partial")

    def _targets(self) -> list:
        """(partial, final) paths of every file written so far."""
        directory = os.path.dirname(os.path.abspath(self.stem))
        return [
            (self._partial(p), p)
            for f in self.files
            for p in _with_labels_file(os.path.join(directory, f["path"]))
        ]

    def _flush(self):
        tmp, rows = self._tmp, self._rows
        tmp.flush()
        tmp.close()
        self._tmp = None
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        index = None if self.shard_size is None else len(self.files)
        path = self._name(index)
        # Listed first: abort() then removes its partial files even if writing fails.
        self.files.append({"path": os.path.basename(path), "rows": rows})
        try:
            if self.fmt == "npz":
                x = np.memmap(tmp.name, dtype=np.float32, mode="r", shape=(rows, self.d))
                meta = json.dumps({**self.metadata, "shard": index}, sort_keys=True)
                with open(self._partial(path), "wb") as out:
                    np.savez(out, features=x, labels=labels, metadata=np.array(meta))
                del x
            else:
                labels_path = _sibling_labels_path(path)
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False,
                    "shape": (rows, self.d),
                }
                with open(self._partial(path), "wb") as out, open(tmp.name, "rb") as src:
                    np.lib.format.write_array_header_1_0(out, header)
                    for block in iter(lambda: src.read(1 << 24), b""):
                        out.write(block)
                with open(self._partial(labels_path), "wb") as out:
                    np.save(out, labels)
        finally:
            os.unlink(tmp.name)

    def close(self):
        if self._tmp is not None:
            self._flush()

    def commit(self):
        """Move every written file from its partial name to its final one (replacing an
        earlier run's file of that name)."""
        for partial, final in self._targets():
            os.replace(partial, final)

    def abort(self):
        """Remove everything this run wrote (its partial files): a failed or interrupted
        run leaves no output of its own and an earlier run's output untouched."""
        if self._tmp is not None:
            self._tmp.close()
            os.unlink(self._tmp.name)
            self._tmp = None
        for partial, _ in self._targets():
            if os.path.exists(partial):
                os.unlink(partial)
        self.files = []


# --------------------------------------------------------------------------- #
# The extractor
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract` wrote.

    Attributes
    ----------
    files : list of str
        The feature files (``.npz`` or ``.features.npy``), readable by
        :func:`dpfc_native.data.load_features` and ``dpfc train``.
    manifest : str
        The JSON record (model, hashes, preprocessing, classes, shards, skipped).
    n, d : int
        Rows written and feature dimension.
    classes : list of str
        Class names in label order.
    skipped : list of dict
        ``{"path", "error"}`` of every image that could not be read.
    metadata : dict
        The manifest's content.
    """

    files: list
    manifest: str
    n: int
    d: int
    classes: list
    skipped: list
    metadata: dict


def _merged_preprocess(net, given: Optional[dict]) -> Preprocess:
    """The model's own preprocessing, with the entries of ``given`` replacing its own."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    try:
        base = net.default_preprocess()
    except _NoPreprocess:
        # The model states no preprocessing at all (a present but broken sidecar or
        # metadata entry is an error, never replaced by these arguments).
        if "crop" not in given:  # nothing to fall back on: the error says what to pass
            raise
        base = None
    if not given:
        return base
    merged = (
        {}
        if base is None
        else {
            "crop": list(base.crop),
            "mean": list(base.mean),
            "std": list(base.std),
            "interpolation": base.interpolation,
            "resize": list(base.resize) if isinstance(base.resize, tuple) else base.resize,
            "crop_mode": base.crop_mode,
        }
    )
    if "crop" in given and "resize" not in given:
        merged.pop("resize", None)  # derived from the new crop (crop / 0.875)
    if "resize" in given:
        # An int resize is the shorter side (aspect kept); a pair takes the default of a
        # pair (exactly that size) unless a crop_mode is given.
        if isinstance(given["resize"], (list, tuple)):
            merged.pop("crop_mode", None)
        else:
            merged["crop_mode"] = "center"
    merged.update(given)
    source = "argument" + ("" if base is None else f" over {base.source}")
    return Preprocess.from_dict(merged, f"{source}: {', '.join(sorted(given))}")


def _read_image(path: str, preprocess: Preprocess):
    from PIL import Image

    try:
        with open_regular(path) as fh, Image.open(fh) as img:
            img.load()
            return preprocess(img), None
    except Exception as exc:  # PIL raises many types for bad files; report, never crash
        return None, f"{type(exc).__name__}: {exc}"


def _stem(output: str) -> tuple:
    low = output.lower()
    if low.endswith(".features.npy"):
        return output[: -len(".features.npy")], "npy"
    if low.endswith(".npz"):
        return output[:-4], "npz"
    if low.endswith(".npy"):
        return output[:-4], "npy"
    return output, "npz"


def existing_outputs(output) -> list:
    """The files of an earlier extraction to ``output`` that a new run would replace: its
    record ``out.json``, the files that record lists (``.labels.npy`` partners
    included), and the file names this run writes (``out.npz``, ``out.features.npy`` +
    ``out.labels.npy``). Nothing is matched by name pattern alone, so another output
    such as ``out-2024.npz`` beside it is never taken for a shard of this one."""
    stem, fmt = _stem(os.fspath(output))
    directory = os.path.dirname(os.path.abspath(stem))
    candidates = [stem + ".json", stem + ".npz", stem + ".features.npy", stem + ".labels.npy"]
    try:
        with open(stem + ".json") as f:
            record = json.load(f)
        for entry in record.get("files", []) if isinstance(record, dict) else []:
            name = entry.get("path") if isinstance(entry, dict) else None
            if isinstance(name, str) and os.path.basename(name) == name:
                candidates += _with_labels_file(os.path.join(directory, name))
    except (OSError, ValueError):
        pass  # no record (or an unreadable one): only this run's own names
    found, seen = [], set()
    for path in candidates:
        key = os.path.abspath(path)
        if key not in seen and os.path.isfile(path):
            seen.add(key)
            found.append(path)
    return sorted(found)


def extract(
    source,
    model,
    output,
    *,
    weights=None,
    root=None,
    classes: Optional[Sequence[str]] = None,
    preprocess=None,
    batch_size: int = 64,
    device: str = "auto",
    on_error: str = "fail",
    shard_size: Optional[int] = None,
    output_name: Optional[str] = None,
    workers: Optional[int] = None,
    threads: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    verbose: int = 0,
) -> ExtractResult:
    """Run a frozen pre-trained model over labelled images and write feature shards.

    Parameters
    ----------
    source : path
        A class-per-subfolder folder or a CSV of ``path,label`` (see :func:`list_images`).
    model : path or str
        A ``.onnx`` file, or ``"timm:NAME"`` (with ``weights``). Never downloaded.
    output : path
        ``out.npz`` (or no suffix) for ``.npz``; ``out.npy`` / ``out.features.npy`` for
        paired ``.npy`` files. With ``shard_size``, shards ``out-00000.npz``, ... The
        manifest is ``out.json``. Existing files are overwritten, and data files of an
        earlier extraction to the same output that this one does not rewrite (another
        shard count) are removed once it succeeds (see :func:`existing_outputs`).
    weights : path, optional
        Local checkpoint of a timm model.
    root : path, optional
        Base folder of a CSV's relative paths.
    classes : sequence of str, optional
        The public label set in label order (default: sub-folder names or CSV labels).
    preprocess : Preprocess or dict, optional
        A full spec, or a dict of entries (``crop``, ``resize``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``) replacing those of the model's own
        preprocessing (see the module docstring).
    batch_size : int
        Images per forward pass.
    device : {"auto", "cpu", "cuda"}
    on_error : {"fail", "skip"}
        An unreadable image raises :class:`ExtractError` naming its path ("fail"), or is
        left out, reported in ``skipped`` and the manifest ("skip").
    shard_size : int, optional
        Rows per output file (default: one file).
    output_name : str, optional
        The ONNX output to use (default the first).
    workers : int, optional
        Threads decoding images (default ``min(4, cpu count)``).
    threads : int
        ONNX Runtime intra-op threads (0: its default).
    progress : callable(done, total), optional
        Called after every batch with the images processed so far.
    verbose : int
        1: progress on stderr, a bar on a terminal, otherwise a plain line every few
        seconds (``extract: 640/1347 (48%), 21s elapsed, ~23s left``), as ``dpfc extract``
        shows it.

    Returns
    -------
    ExtractResult
    """
    from . import __version__
    from ._progress import progress as _progress_report

    if on_error not in ("fail", "skip"):
        raise ExtractError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ExtractError(f"batch_size must be a positive int, got {batch_size!r}")
    if shard_size is not None and (int(shard_size) != shard_size or shard_size < 1):
        raise ExtractError(f"shard_size must be a positive int, got {shard_size!r}")
    paths, labels, class_names = list_images(source, root=root, classes=classes)
    net = load_model(
        model, weights=weights, device=device, output_name=output_name, threads=threads
    )
    if isinstance(preprocess, Preprocess):
        spec = preprocess
    else:
        spec = _merged_preprocess(net, preprocess)
    stem, fmt = _stem(os.fspath(output))
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    earlier = existing_outputs(output)  # an earlier run's files, read from its record
    metadata = {
        "dpfc_native_version": __version__,
        "model": net.info,
        "weights": net.weights,
        "preprocess": spec.to_dict(),
        "classes": class_names,
        "source": os.path.abspath(os.fspath(source)),
        "layout": "csv" if not Path(source).is_dir() else "class-per-subfolder",
        "dtype": "float32",
        "device": net.device,
        "batch_size": int(batch_size),
    }
    writer = _ShardWriter(stem, fmt, None if shard_size is None else int(shard_size), metadata)
    skipped: list = []
    total = len(paths)
    done = 0
    workers = workers or min(4, os.cpu_count() or 1)
    try:
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            _progress_report(total, "extract", enabled=verbose > 0) as bar,
        ):
            for start in range(0, total, batch_size):
                chunk = paths[start : start + batch_size]
                images, keep = [], []
                for i, (arr, err) in enumerate(pool.map(lambda p: _read_image(p, spec), chunk)):
                    if err is not None:
                        if on_error == "fail":
                            raise ExtractError(
                                f"cannot read image {chunk[i]}: {err} "
                                "(on_error='skip' leaves it out)"
                            )
                        skipped.append({"path": chunk[i], "error": err})
                        continue
                    images.append(arr)
                    keep.append(start + i)
                if images:
                    feats = net(np.stack(images))
                    feats = feats.reshape(feats.shape[0], -1) if feats.ndim > 2 else feats
                    if feats.ndim != 2 or feats.shape[0] != len(images):
                        raise ExtractError(
                            f"the model returned shape {feats.shape} for a "
                            f"batch of {len(images)} images; expected (N, D)"
                        )
                    if not np.isfinite(feats).all():
                        raise ExtractError(
                            f"the model returned NaN or Inf features (batch starting at {chunk[0]})"
                        )
                    if writer.d is not None and feats.shape[1] != writer.d:
                        raise ExtractError("the model's feature dimension changed between batches")
                    writer.add(feats, labels[keep])
                done += len(chunk)
                bar.update(done, status=f"{len(skipped)} skipped" if skipped else None)
                if progress is not None:
                    progress(done, total)
        if writer.d is None:
            raise ExtractError(f"no image of {source} could be read ({len(skipped)} skipped)")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    n = sum(f["rows"] for f in writer.files)
    metadata.update(n=n, d=int(writer.d), files=writer.files, skipped=skipped)
    manifest = stem + ".json"
    try:
        with open(writer._partial(manifest), "w") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
    except BaseException:
        writer.abort()
        raise
    # Only now does an earlier run's output give way: data files, then the record.
    writer.commit()
    os.replace(writer._partial(manifest), manifest)
    directory = os.path.dirname(os.path.abspath(stem))
    # Files of an earlier run to the same output that this run did not rewrite (other
    # shard counts or layout) would mix with these under a glob: the record lists only
    # this run's files, so the others go.
    written = {final for _, final in writer._targets()}
    for path in earlier:
        if os.path.abspath(path) not in written and not path.endswith(".json"):
            if os.path.isfile(path):
                os.remove(path)
    return ExtractResult(
        [os.path.join(directory, f["path"]) for f in writer.files],
        manifest,
        n,
        int(writer.d),
        class_names,
        skipped,
        metadata,
    )


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def _parse_floats(text: Optional[str], name: str):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ExtractError(f"{name} expects 3 comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise ExtractError(f"{name} expects 3 comma-separated numbers, got {text!r}")
    return values


def register_cli(app) -> None:
    """Add the ``extract`` command to a typer application (``dpfc extract``)."""
    import typer

    from .cli import _user_errors

    @app.command("extract")
    @_user_errors
    def extract_command(
        images: Path = typer.Argument(
            ..., help="Image folder (one sub-folder per class) or a CSV of path,label."
        ),
        model: str = typer.Argument(
            ..., help="A local .onnx file, or timm:NAME with --weights (never downloaded)."
        ),
        output: Path = typer.Option(
            Path("features.npz"),
            "--output",
            "-o",
            help="out.npz, or out.npy for paired .npy files; out.json is the record.",
        ),
        weights: Optional[Path] = typer.Option(
            None, "--weights", help="Local checkpoint of a timm model."
        ),
        root: Optional[Path] = typer.Option(
            None,
            "--root",
            help="Base folder of the CSV's relative paths (default: the CSV's folder).",
        ),
        classes: Optional[str] = typer.Option(
            None,
            "--classes",
            help="The public label set "
            "in label order, comma-separated (default: "
            "sub-folder names / CSV labels, sorted).",
        ),
        batch_size: int = typer.Option(64, "--batch-size", "-b"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        skip_bad: bool = typer.Option(
            False,
            "--skip-bad/--fail-bad",
            help="Leave out "
            "unreadable images (listed in the record) instead of "
            "stopping at the first.",
        ),
        shard_size: Optional[int] = typer.Option(
            None, "--shard-size", help="Rows per output file (default: one file)."
        ),
        crop: Optional[int] = typer.Option(
            None, "--crop", help="Override: centre-crop size (the model's input size)."
        ),
        resize: Optional[int] = typer.Option(
            None, "--resize", help="Override: shorter side before the crop (default crop / 0.875)."
        ),
        mean: Optional[str] = typer.Option(None, "--mean", help="Override: R,G,B mean."),
        std: Optional[str] = typer.Option(None, "--std", help="Override: R,G,B std."),
        interpolation: Optional[str] = typer.Option(
            None, "--interpolation", help="Override: bilinear | bicubic | nearest | lanczos."
        ),
        output_name: Optional[str] = typer.Option(
            None, "--output-name", help="ONNX output to use (default: the first)."
        ),
        force: bool = typer.Option(
            False, "--force", help="Replace the files of an earlier extraction to --output."
        ),
    ):
        """Features of a frozen pre-trained model for a labelled image folder, written in
        the formats `dpfc train` reads, with a record of the model, its SHA-256 and the
        preprocessing."""
        import signal
        import threading
        import time

        from .cli import _USER_ERRORS, _console, _fail

        present = existing_outputs(output)
        if present and not force:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            _fail(
                f"--output {output}: files of an earlier extraction exist ({shown}); "
                "pass --force to replace them"
            )
        console = _console()
        t0 = time.perf_counter()

        def _terminated(signum, frame):  # kill / timeout / a scheduler: clean up as Ctrl-C
            raise KeyboardInterrupt(f"signal {signum}")

        main = threading.current_thread() is threading.main_thread()  # signals: main only
        previous = signal.signal(signal.SIGTERM, _terminated) if main else None
        try:
            overrides = {
                "crop": crop,
                "resize": resize,
                "interpolation": interpolation,
                "mean": _parse_floats(mean, "--mean"),
                "std": _parse_floats(std, "--std"),
            }
            # Progress on stderr: a bar on a terminal, plain lines in logs (no TTY).
            result = extract(
                images,
                model,
                output,
                weights=weights,
                root=root,
                classes=None
                if classes is None
                else [c.strip() for c in classes.split(",") if c.strip()],
                preprocess=overrides,
                batch_size=batch_size,
                device=device,
                on_error="skip" if skip_bad else "fail",
                shard_size=shard_size,
                output_name=output_name,
                verbose=1,
            )
        except _USER_ERRORS as exc:
            _fail(str(exc).replace("on_error='skip'", "--skip-bad"))
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        for item in result.skipped:
            console.print(f"skipped {item['path']}: {item['error']}", highlight=False, markup=False)
        meta = result.metadata
        console.print(
            f"{result.n} images -> features ({result.n}, {result.d}) float32, "
            f"{len(result.classes)} classes, {len(result.skipped)} skipped, "
            f"{time.perf_counter() - t0:.1f} s on {meta['device']}",
            highlight=False,
        )
        console.print(
            f"model: {meta['model'].get('name')} ({meta['model']['backend']}), "
            f"weights sha256 {meta['weights']['sha256'][:16]}...",
            highlight=False,
        )
        console.print(
            f"preprocessing: {meta['preprocess']['source']}", highlight=False, markup=False
        )
        for path in result.files:
            console.print(f"wrote {path}", highlight=False, markup=False)
        console.print(f"record: {result.manifest}", highlight=False, markup=False)
