"""``dpfc extract`` / :func:`dpfc_native.extract.extract` on a generated image folder and
a small randomly initialised ONNX model (no network), against a float64 NumPy reference.

The timm backend's tests need torch and timm (the ``[timm]`` extra, which CI installs); they
skip where those are missing, unless ``DPFC_REQUIRE_TIMM=1``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dpfc_native import data  # noqa: E402
from dpfc_native.cli import app  # noqa: E402
from dpfc_native.extract import (  # noqa: E402
    ExtractError,
    Preprocess,
    existing_outputs,
    extract,
    list_images,  # noqa: E402
    sha256_file,
)

runner = CliRunner()
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
CLASSES = ("ant", "bee", "cat")
COUNTS = (4, 3, 6)  # odd, unequal sizes


def _make_model(path, h, w, channels=5, d=7, seed=0, meta=None):
    """Conv 3x3 (pad 1) -> ReLU -> global average pool -> flatten -> Gemm: (N,3,H,W) -> (N,d)."""
    rng = np.random.default_rng(seed)
    wc = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.5
    bc = rng.standard_normal(channels).astype(np.float32) * 0.1
    wg = rng.standard_normal((channels, d)).astype(np.float32)
    bg = rng.standard_normal(d).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", d])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((wc, "wc"), (bc, "bc"), (wg, "wg"), (bg, "bg"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return tuple(a.astype(np.float64) for a in (wc, bc, wg, bg))


def _reference(pixels, params, mean=MEAN, std=STD):
    """float64 forward pass of _make_model on (H, W, 3) uint8 pixels."""
    wc, bc, wg, bg = params
    x = (pixels.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    x = x.transpose(2, 0, 1)
    h, w = x.shape[1:]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    conv = np.zeros((wc.shape[0], h, w))
    for di in range(3):
        for dj in range(3):
            conv += np.einsum("oc,chw->ohw", wc[:, :, di, dj], xp[:, di : di + h, dj : dj + w])
    conv += bc[:, None, None]
    pooled = np.maximum(conv, 0).mean(axis=(1, 2))
    return pooled @ wg + bg


def _folder(root, h, w, seed=0, counts=COUNTS, sizes=None):
    """class-per-subfolder PNGs (lossless) of random pixels; returns {path: pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name, count in zip(CLASSES, counts):
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            hh, ww = sizes[i % len(sizes)] if sizes else (h, w)
            arr = rng.integers(0, 256, size=(hh, ww, 3), dtype=np.uint8)
            path = root / name / f"img{i:02d}.png"
            Image.fromarray(arr).save(path)
            pixels[str(path)] = arr
    (root / "ant" / "notes.txt").write_text("not an image: ignored")
    return pixels


@pytest.fixture
def setup(tmp_path):
    h, w = 9, 11
    params = _make_model(
        tmp_path / "tiny.onnx",
        h,
        w,
        meta={
            "dpfc_preprocess": json.dumps(
                {"crop": [h, w], "resize": [h, w], "mean": MEAN, "std": STD}
            )
        },
    )
    pixels = _folder(tmp_path / "imgs", h, w)
    return tmp_path, params, pixels


def test_features_match_float64_reference_and_label_mapping(setup):
    tmp, params, pixels = setup
    res = extract(
        tmp / "imgs", tmp / "tiny.onnx", tmp / "out" / "feats.npz", batch_size=4, device="cpu"
    )
    fs = data.load_features(res.files[0])  # what `dpfc train` reads
    assert fs.features.shape == (sum(COUNTS), 7) and fs.features.dtype == np.float32
    assert res.classes == list(CLASSES)
    paths, labels, classes = list_images(tmp / "imgs")
    np.testing.assert_array_equal(fs.labels, labels)
    np.testing.assert_array_equal(np.bincount(fs.labels), COUNTS)
    ref = np.stack([_reference(pixels[p], params) for p in paths])
    # float32 inference of a float64 reference: every element written and close.
    np.testing.assert_allclose(fs.features, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    for p, y in zip(paths, fs.labels):
        assert os.path.basename(os.path.dirname(p)) == CLASSES[y]


def test_deterministic_and_batch_size_independent(setup):
    tmp, _, _ = setup
    a = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "a.npz", batch_size=5, device="cpu")
    b = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "b.npz", batch_size=5, device="cpu")
    c = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "c.npz", batch_size=1, device="cpu")
    fa, fb, fc = (np.load(r.files[0]) for r in (a, b, c))
    np.testing.assert_array_equal(fa["features"], fb["features"])
    np.testing.assert_array_equal(fa["labels"], fb["labels"])
    np.testing.assert_allclose(fa["features"], fc["features"], rtol=1e-5, atol=1e-6)


def test_metadata_records_model_weights_hash_and_preprocessing(setup):
    tmp, _, _ = setup
    res = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "m.npz", device="cpu")
    with open(res.manifest) as f:
        meta = json.load(f)
    digest = sha256_file(tmp / "tiny.onnx")
    assert meta["model"]["backend"] == "onnx" and meta["model"]["name"] == "tiny.onnx"
    assert meta["model"]["sha256"] == digest == meta["weights"]["sha256"]
    assert len(digest) == 64
    pre = meta["preprocess"]
    assert pre["crop"] == [9, 11] and pre["mean"] == list(MEAN) and pre["std"] == list(STD)
    assert "dpfc_preprocess" in pre["source"]
    assert meta["classes"] == list(CLASSES) and meta["n"] == sum(COUNTS) and meta["d"] == 7
    assert meta["skipped"] == [] and meta["files"] == [{"path": "m.npz", "rows": sum(COUNTS)}]
    inner = json.loads(str(np.load(res.files[0])["metadata"]))
    assert inner["model"]["sha256"] == digest and inner["preprocess"] == pre


def test_bad_image_fails_with_its_path_or_is_skipped(setup):
    tmp, params, pixels = setup
    bad = tmp / "imgs" / "bee" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ExtractError, match="broken.jpg"):
        extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "f.npz", device="cpu")
    assert not (tmp / "f.npz").exists() and not (tmp / "f.json").exists()
    # With shards: the ones written before the bad image are removed too.
    with pytest.raises(ExtractError, match="broken.jpg"):
        extract(
            tmp / "imgs",
            tmp / "tiny.onnx",
            tmp / "sh.npy",
            device="cpu",
            shard_size=2,
            batch_size=2,
        )
    assert not [p for p in os.listdir(tmp) if p.startswith("sh")]
    assert not [p for p in os.listdir(tmp) if p.startswith(".dpfc-extract-")]
    res = extract(
        tmp / "imgs", tmp / "tiny.onnx", tmp / "s.npz", device="cpu", on_error="skip", batch_size=2
    )
    assert [s["path"] for s in res.skipped] == [str(bad)]
    fs = data.load_features(res.files[0])
    assert fs.n == sum(COUNTS)
    paths, labels, _ = list_images(tmp / "imgs")
    good = [i for i, p in enumerate(paths) if p != str(bad)]
    np.testing.assert_array_equal(fs.labels, labels[good])
    ref = np.stack([_reference(pixels[paths[i]], params) for i in good])
    np.testing.assert_allclose(fs.features, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert json.load(open(res.manifest))["skipped"][0]["path"] == str(bad)


def _cli_extract(tmp, out, *options):
    """``dpfc extract`` of the setup's image tree with its tiny model, on the CPU."""
    return runner.invoke(
        app,
        [
            "extract",
            str(tmp / "imgs"),
            str(tmp / "tiny.onnx"),
            "-o",
            str(out),
            "--device",
            "cpu",
            *options,
        ],
    )


def test_cli_extract_then_train(setup):
    tmp, _, _ = setup
    bad = tmp / "imgs" / "cat" / "truncated.png"
    good = (tmp / "imgs" / "cat" / "img00.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    out = tmp / "cli" / "train.npz"
    result = _cli_extract(tmp, out, "--batch-size", "3")
    assert result.exit_code == 2, result.output
    assert "truncated.png" in result.output and "--skip-bad" in result.output
    assert "Traceback" not in result.output
    result = _cli_extract(tmp, out, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "truncated.png" in result.output
    assert f"{sum(COUNTS)} images" in result.output and "sha256" in result.output
    result = runner.invoke(
        app,
        [
            "train",
            str(out),
            "--method",
            "ls",
            "--epsilon",
            "4",
            "--num-classes",
            "3",
            "--output",
            str(tmp / "model.npz"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_cli_extract_refuses_to_replace_an_earlier_run_without_force(setup):
    """Files of an earlier extraction are not overwritten without --force; with it, the
    earlier run's shards that the new run does not rewrite are removed (a glob over the
    output would otherwise mix the two runs)."""
    tmp, _, _ = setup
    out = tmp / "o" / "x.npz"
    res = _cli_extract(tmp, out, "--shard-size", "2")
    assert res.exit_code == 0, res.output
    shards = sorted((tmp / "o").glob("x-*.npz"))
    assert len(shards) > 1
    before = {p.name: p.read_bytes() for p in (tmp / "o").iterdir()}
    res = _cli_extract(tmp, out, "--mean", "0,0,0")
    assert res.exit_code == 2 and "pass --force" in res.output, res.output
    assert {p.name: p.read_bytes() for p in (tmp / "o").iterdir()} == before
    res = _cli_extract(tmp, out, "--force")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp / "o").iterdir()) == ["x.json", "x.npz"]
    record = json.loads((tmp / "o" / "x.json").read_text())
    assert [f["path"] for f in record["files"]] == ["x.npz"]


def test_fixed_batch_models_run_padded_and_refusals_are_one_line(tmp_path):
    """A model exported with a fixed batch of 4 runs on any number of images (batches of
    4, the last padded, padding dropped): the same bits as the dynamic-batch model. A
    model that refuses its input (here an image size that does not fit it) is one line
    naming the options to use, exit 2."""
    h, w = 9, 11
    _make_model(tmp_path / "dyn.onnx", h, w)
    model = onnx.load(str(tmp_path / "dyn.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    _folder(tmp_path / "imgs", h, w)

    def run(model, out, *options):
        args = [str(tmp_path / "imgs"), str(tmp_path / model), "-o", str(tmp_path / out)]
        return runner.invoke(app, ["extract", *args, "--device", "cpu", *options])

    for model_name, out in (("dyn.onnx", "a.npz"), ("fixed.onnx", "b.npz")):
        res = run(model_name, out, "--batch-size", "5")
        assert res.exit_code == 0, res.output
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["features"].shape[0] % 4 != 0  # a short last batch was padded
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    res = run("fixed.onnx", "c.npz", "--crop", "8")  # the model's input is 9 x 11
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--crop" in errors[0] and "Traceback" not in res.output


def test_csv_layout_npy_shards_and_label_order(tmp_path):
    h = w = 8
    params = _make_model(tmp_path / "m.onnx", h, w, d=4, seed=1)
    pixels = _folder(tmp_path / "imgs", h, w, seed=2)
    rows = []
    for i, p in enumerate(sorted(pixels)):
        rows.append((os.path.relpath(p, tmp_path), str([10, 2, 33][i % 3])))
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    res = extract(
        tmp_path / "list.csv",
        tmp_path / "m.onnx",
        tmp_path / "o" / "x.npy",
        shard_size=5,
        device="cpu",
        preprocess={"crop": 8, "resize": 8, "mean": MEAN, "std": STD},
    )
    n = len(rows)
    assert res.classes == ["2", "10", "33"]  # integer names sort numerically
    assert [os.path.basename(f) for f in res.files] == [
        f"x-{i:05d}.features.npy" for i in range(-(-n // 5))
    ]
    shards = [data.load_features(f, num_classes=3) for f in res.files]
    assert [s.n for s in shards] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    feats = np.concatenate([s.features for s in shards])
    labels = np.concatenate([s.labels for s in shards])
    np.testing.assert_array_equal(labels, [res.classes.index(r[1]) for r in rows])
    ref = np.stack([_reference(pixels[str(tmp_path / r[0])], params) for r in rows])
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # An explicit public label set fixes the order; a label outside it is an error.
    res2 = extract(
        tmp_path / "list.csv",
        tmp_path / "m.onnx",
        tmp_path / "y.npz",
        classes=["33", "10", "2", "99"],
        device="cpu",
        preprocess={"crop": 8, "resize": 8},
    )
    np.testing.assert_array_equal(
        np.load(res2.files[0])["labels"], [["33", "10", "2"].index(r[1]) for r in rows]
    )
    with pytest.raises(ExtractError, match="labels not in classes"):
        extract(
            tmp_path / "list.csv",
            tmp_path / "m.onnx",
            tmp_path / "z.npz",
            classes=["2", "10"],
            device="cpu",
        )


def test_resize_and_crop_follow_the_spec(tmp_path):
    # Images of odd, varied sizes: resized (shorter side) with PIL bilinear, centre-cropped.
    params = _make_model(tmp_path / "m.onnx", 6, 6, d=3, seed=4)
    pixels = _folder(
        tmp_path / "imgs", 0, 0, seed=5, counts=(2, 1, 2), sizes=[(13, 9), (7, 17), (10, 10)]
    )
    spec = Preprocess(resize=8, crop=(6, 6), mean=MEAN, std=STD)
    res = extract(
        tmp_path / "imgs", tmp_path / "m.onnx", tmp_path / "r.npz", preprocess=spec, device="cpu"
    )
    paths, _, _ = list_images(tmp_path / "imgs")
    expected = []
    for p in paths:
        img = Image.fromarray(pixels[p])
        w, h = img.size
        size = (8, int(8 * h / w)) if w <= h else (int(8 * w / h), 8)
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = round((size[0] - 6) / 2), round((size[1] - 6) / 2)
        expected.append(_reference(np.asarray(img.crop((left, top, left + 6, top + 6))), params))
    got = np.load(res.files[0])["features"]
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-4, atol=1e-4)


def test_guessed_preprocessing_is_marked_and_errors_are_clear(tmp_path):
    _make_model(tmp_path / "m.onnx", 7, 7, d=3)
    _folder(tmp_path / "imgs", 12, 12, counts=(1, 1, 1))
    res = extract(tmp_path / "imgs", tmp_path / "m.onnx", tmp_path / "g.npz", device="cpu")
    pre = res.metadata["preprocess"]
    assert pre["source"].startswith("GUESSED") and pre["crop"] == [7, 7] and pre["resize"] == 8
    with pytest.raises(ExtractError, match="model file not found"):
        extract(tmp_path / "imgs", tmp_path / "missing.onnx", tmp_path / "g.npz")
    with pytest.raises(ExtractError, match="no class sub-folders"):
        extract(tmp_path / "imgs" / "ant", tmp_path / "m.onnx", tmp_path / "g.npz")
    with pytest.raises(ExtractError, match="never downloads"):
        extract(tmp_path / "imgs", "timm:resnet18", tmp_path / "g.npz")
    result = runner.invoke(
        app,
        [
            "extract",
            str(tmp_path / "imgs"),
            str(tmp_path / "m.onnx"),
            "--mean",
            "1,2",
            "-o",
            str(tmp_path / "e.npz"),
        ],
    )
    assert result.exit_code == 2 and "--mean expects 3" in result.output


# The timm backend needs torch and timm, which the package never installs. Where they are
# not importable its tests skip, except under DPFC_REQUIRE_TIMM=1 (CI installs the [timm]
# extra and sets it): there a missing torch or timm fails them instead.
_TIMM_MISSING = any(importlib.util.find_spec(m) is None for m in ("timm", "torch"))
needs_timm = pytest.mark.skipif(
    _TIMM_MISSING and os.environ.get("DPFC_REQUIRE_TIMM") != "1",
    reason="torch and timm are not installed (the [timm] extra; CI installs it)",
)


def _timm_net(seed=0, num_classes=0, name="resnet18"):
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


def _timm_reference(net, folder):
    """timm's own evaluation transform and a float32 torch forward pass of ``net``."""
    import timm
    import torch

    cfg = timm.data.resolve_data_config({}, model=net)
    transform = timm.data.create_transform(**cfg)
    paths, _, _ = list_images(folder)
    with torch.inference_mode():
        return net(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])).numpy()


def _timm_extract(tmp_path, out, weights, model="timm:resnet18", **kw):
    """``extract`` of tmp_path/imgs through a timm model: the result and its features."""
    res = extract(tmp_path / "imgs", model, tmp_path / out, weights=tmp_path / weights, **kw)
    return res, np.load(res.files[0])["features"]


@needs_timm
def test_timm_backend_matches_torch_eval(tmp_path):
    import torch

    net = _timm_net()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    _folder(tmp_path / "imgs", 40, 50, counts=(2, 1, 1))
    res, got = _timm_extract(tmp_path, "t.npz", "w.pth", device="cpu", batch_size=3)
    ref = _timm_reference(net, tmp_path / "imgs")
    assert got.shape == (4, 512) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert res.metadata["weights"]["sha256"] == sha256_file(tmp_path / "w.pth")
    assert res.metadata["preprocess"]["source"] == "timm resolve_data_config"
    info = res.metadata["model"]
    assert info["backend"] == "timm" and info["name"] == "resnet18"
    assert info["ignored_checkpoint_keys"] == []


@needs_timm
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_timm_preprocessing_is_timms_own(tmp_path, name):
    # Bicubic models with crop_pct 0.9 and 0.875 (resnet18 above: bilinear), on images
    # smaller, larger and not the shape of the input: the rows the package feeds the model
    # are timm's evaluation transform's, so the features are the same bits (one batch).
    import torch

    net = _timm_net(seed=8, name=name)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    _folder(tmp_path / "imgs", 0, 0, seed=9, counts=(2, 1, 2), sizes=[(37, 61), (300, 231)])
    res, got = _timm_extract(tmp_path, "o.npz", "w.pth", model=f"timm:{name}")
    assert res.metadata["preprocess"]["interpolation"] == "bicubic"
    np.testing.assert_array_equal(got, _timm_reference(net, tmp_path / "imgs"))


@needs_timm
def test_timm_checkpoint_formats_give_the_same_features(tmp_path):
    # A full model's checkpoint (its 5-class head is not part of the features), saved as
    # .safetensors and as a training script's {"state_dict": ...} .pth, on images of odd,
    # unequal sizes: the same bits from both files and from the CLI, run twice.
    import torch
    from safetensors.torch import save_file

    net = _timm_net(seed=3, num_classes=5)
    state = net.state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 7, "state_dict": state}, tmp_path / "w.pth")
    _folder(tmp_path / "imgs", 0, 0, seed=4, counts=(2, 2, 1), sizes=[(37, 61), (80, 23)])
    out = {}
    for ext in ("safetensors", "pth"):
        res, out[ext] = _timm_extract(
            tmp_path, f"{ext}.npz", f"w.{ext}", device="auto", batch_size=2
        )
        assert res.metadata["weights"]["sha256"] == sha256_file(tmp_path / f"w.{ext}")
        assert sorted(res.metadata["model"]["ignored_checkpoint_keys"]) == ["fc.bias", "fc.weight"]
    np.testing.assert_array_equal(out["safetensors"], out["pth"])
    headless = _timm_net(seed=3, num_classes=5)
    headless.reset_classifier(0)
    np.testing.assert_allclose(
        out["pth"], _timm_reference(headless, tmp_path / "imgs"), rtol=1e-4, atol=1e-4
    )
    for run in range(2):
        result = runner.invoke(
            app,
            [
                "extract",
                str(tmp_path / "imgs"),
                "timm:resnet18",
                "--weights",
                str(tmp_path / "w.safetensors"),
                "--device",
                "cpu",
                "-o",
                str(tmp_path / f"cli{run}.npz"),
            ],
        )
        assert result.exit_code == 0, result.output
        cli = data.load_features(tmp_path / f"cli{run}.npz")
        np.testing.assert_array_equal(cli.features, out["safetensors"])
        np.testing.assert_array_equal(np.bincount(cli.labels), (2, 2, 1))


@needs_timm
def test_timm_errors_name_the_problem(tmp_path):
    import torch

    _folder(tmp_path / "imgs", 12, 12, counts=(1, 1, 1))
    state = _timm_net().state_dict()
    torch.save(state, tmp_path / "w.pth")

    def run(model="timm:resnet18", weights="w.pth", **kw):
        return _timm_extract(tmp_path, "o.npz", weights, model=model, **kw)

    with pytest.raises(ExtractError, match="timm cannot build 'no_such_net'"):
        run("timm:no_such_net")
    with pytest.raises(ExtractError, match="weights file not found"):
        run(weights="absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractError, match="cannot read weights"):
        run(weights="junk.pth")
    # resnet18's weights lack resnet34's extra blocks
    with pytest.raises(ExtractError, match="does not fit timm:resnet34: missing"):
        run("timm:resnet34")
    bad = dict(state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(bad, tmp_path / "shape.pth")
    mismatch = "(?s)shape.pth does not fit timm:resnet18.*conv1.weight"
    with pytest.raises(ExtractError, match=mismatch):
        run(weights="shape.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ExtractError, match="holds no state dict"):
        run(weights="list.pth")
    torch.save({"fn": _timm_net}, tmp_path / "code.pth")  # unpickling would run code
    with pytest.raises(ExtractError, match="loads without running code") as info:
        run(weights="code.pth")
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(ExtractError, match="torch sees no CUDA device"):
            run(device="cuda")


@pytest.mark.gpu
@needs_timm
def test_timm_backend_on_cuda_matches_cpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    torch.save(_timm_net(seed=5).state_dict(), tmp_path / "w.pth")
    _folder(tmp_path / "imgs", 33, 47, seed=6, counts=(3, 2, 2))
    got = {}
    for device in ("cpu", "cuda"):
        res, got[device] = _timm_extract(
            tmp_path, f"{device}.npz", "w.pth", device=device, batch_size=4
        )
        assert res.metadata["device"] == device
    assert np.isfinite(got["cuda"]).all()
    # cuDNN convolutions may run in TF32 (10 mantissa bits): relative to the features' scale.
    scale = np.abs(got["cpu"]).max()
    np.testing.assert_allclose(got["cuda"], got["cpu"], rtol=0, atol=1e-2 * scale)


@pytest.mark.gpu
def test_onnx_model_on_cuda_matches_cpu(setup):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)")
    tmp, params, pixels = setup
    res = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "gpu.npz", device="cuda")
    assert res.metadata["device"] == "cuda"
    paths, _, _ = list_images(tmp / "imgs")
    ref = np.stack([_reference(pixels[p], params) for p in paths])
    got = np.load(res.files[0])["features"]
    # CUDA convolutions may run in TF32 (10 mantissa bits): relative to the features' scale.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-2 * np.abs(ref).max())


def test_worked_example_data_gives_the_digits_pixels(tmp_path):
    # The README's worked example: its images and stand-in model, through dpfc extract,
    # give back the package's own digits "pixels" features (up to 8-bit PNG rounding).
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "worked_example_data.py"
    if not script.exists():
        pytest.skip("examples/ is not part of this checkout")
    spec = importlib.util.spec_from_file_location("worked_example_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_images(str(tmp_path))
    module.write_model(str(tmp_path / "pixels.onnx"))
    train, test = data.digits_features()
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for split, ref in (("train", train), ("test", test)):
        res = extract(
            tmp_path / "images" / split,
            tmp_path / "pixels.onnx",
            tmp_path / f"{split}.npz",
            device="cpu",
            batch_size=256,
        )
        got = np.load(res.files[0])
        paths, _, _ = list_images(tmp_path / "images" / split)
        index = np.array([int(os.path.basename(p)[:-4]) for p in paths])
        np.testing.assert_array_equal(got["labels"], bunch.target[index])
        np.testing.assert_allclose(got["features"], bunch.data[index] / 16.0, atol=0.5 / 255 + 1e-6)
        # The same split as data.digits_features (rows in another order).
        assert got["features"].shape == ref.features.shape
        np.testing.assert_allclose(
            np.sort(got["features"].sum(1)),
            np.sort(ref.features.sum(1)),
            atol=64 * 0.5 / 255 + 1e-5,
        )


def test_progress_plain_lines_cli_and_python(setup, monkeypatch, capsys):
    # No TTY (CliRunner, a log): plain lines, here one per batch (interval 0).
    from dpfc_native import _progress

    monkeypatch.setattr(_progress, "DEFAULT_INTERVAL", 0.0)
    tmp, _, _ = setup
    total = sum(COUNTS)
    result = _cli_extract(tmp, tmp / "cli.npz", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("extract: ")]
    counts = [ln.split(",")[0] for ln in lines]
    assert counts[0] == f"extract: 0/{total} (0%)" and "started" in lines[0]
    for done in (4, 8, 12, total):
        assert any(c.startswith(f"extract: {done}/{total} (") for c in counts), lines
    assert lines[-1].startswith(f"extract: {total}/{total} (100%), done")
    assert "\x1b[" not in result.output
    extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "py.npz", device="cpu", batch_size=5, verbose=1)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("extract: ")]
    assert err[0].startswith(f"extract: 0/{total} (0%), started")
    assert any(ln.startswith(f"extract: 10/{total} (") for ln in err), err
    assert err[-1].startswith(f"extract: {total}/{total} (100%), done")
    extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "quiet.npz", device="cpu")
    assert "extract:" not in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_shards_open_with_the_scale_out_reader(setup, suffix):
    # The shards dpfc extract writes are the sharded sources of dpfc_native.shards (the
    # distributed fit's input): the same rows and labels, in order, as one unsharded file.
    from dpfc_native.shards import open_sharded

    tmp, _, _ = setup
    whole = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "whole.npz", device="cpu")
    ref = np.load(whole.files[0])
    res = extract(
        tmp / "imgs",
        tmp / "tiny.onnx",
        tmp / "sh" / f"part{suffix}",
        device="cpu",
        shard_size=4,
        batch_size=3,
    )
    total = sum(COUNTS)
    assert len(res.files) == -(-total // 4)
    sharded = open_sharded(str(tmp / "sh" / f"part-*{suffix}"), num_classes=len(CLASSES))
    assert sharded.shard_rows == (4, 4, 4, total - 12)
    assert sharded.shape == (total, ref["features"].shape[1])
    x, y = sharded.read_global(0, total)
    np.testing.assert_array_equal(x, ref["features"])
    np.testing.assert_array_equal(y, ref["labels"])


def test_csv_with_a_byte_order_mark_and_symlinked_folders(tmp_path):
    rng = np.random.default_rng(40)
    for i in range(11):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with open(tmp_path / "l.csv", "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((f"{i}.png", str(i)) for i in range(11))
    paths, labels, classes = list_images(tmp_path / "l.csv")
    assert classes == [str(i) for i in range(11)] and labels.tolist() == list(range(11))
    assert len(paths) == 11
    # A symlinked sub-folder of a class folder is followed; a link cycle is walked once.
    (tmp_path / "img" / "cat").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name, where in (("a.png", "img/cat"), ("b.png", "elsewhere"), ("c.png", "elsewhere")):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(
            tmp_path / where / name
        )
    os.symlink(tmp_path / "elsewhere", tmp_path / "img" / "cat" / "more")
    os.symlink(tmp_path / "img" / "cat", tmp_path / "elsewhere" / "loop")
    paths, _, _ = list_images(tmp_path / "img")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["a.png", "b.png", "c.png"]


def test_a_failed_or_killed_rerun_leaves_the_earlier_output_intact(setup, tmp_path):
    tmp, _, _ = setup
    out = tmp / "o" / "x.npz"
    assert _cli_extract(tmp, out, "--shard-size", "4").exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp / "o").iterdir()}
    assert len(before) == 5  # 4 shards of 13 rows and the record
    (tmp / "imgs" / "ant" / "zz-broken.png").write_bytes(b"not a png")
    res = _cli_extract(tmp, out, "--shard-size", "4", "--force", "--fail-bad")
    assert res.exit_code == 2 and "zz-broken.png" in res.output, res.output
    assert {p.name: p.read_bytes() for p in (tmp / "o").iterdir()} == before
    # SIGTERM (kill, timeout, a scheduler) cleans up as Ctrl-C does: nothing partial.
    import signal
    import subprocess
    import sys
    import time

    (tmp / "imgs" / "ant" / "zz-broken.png").unlink()
    many = tmp / "many"
    rng = np.random.default_rng(41)
    for c in ("a", "b"):
        (many / c).mkdir(parents=True)
        for i in range(400):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                many / c / f"{i:03d}.png"
            )
    cmd = [sys.executable, "-m", "dpfc_native", "extract", str(many), str(tmp / "tiny.onnx")]
    cmd += ["-o", str(out), "--force", "--device", "cpu", "--batch-size", "1"]
    proc = subprocess.Popen(cmd + ["--shard-size", "16"], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.endswith(".dpfc-partial") for p in (tmp / "o").iterdir()):
        assert proc.poll() is None and time.time() < deadline, "no partial shard seen"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert {p.name: p.read_bytes() for p in (tmp / "o").iterdir()} == before
    assert not [p for p in (tmp / "o").iterdir() if p.name.startswith(".")]


def test_existing_outputs_and_sidecar_errors_name_their_source(setup, tmp_path):
    for name in ("s-99999.npz", "s-100000.npz", "s-20240101.npz", "sx.npz"):
        (tmp_path / name).write_bytes(b"")
    files = [{"path": "s-99999.npz", "rows": 1}, {"path": "s-100000.npz", "rows": 1}]
    (tmp_path / "s.json").write_text(json.dumps({"files": files}))
    found = [os.path.basename(p) for p in existing_outputs(tmp_path / "s.npz")]
    # What the earlier record lists, never another output that merely shares the stem.
    assert found == ["s-100000.npz", "s-99999.npz", "s.json"]
    tmp, _, _ = setup
    h, w = 9, 11
    _make_model(tmp / "plain.onnx", h, w)
    for spec, needle in (
        ({"crop": "8"}, "'crop' must be a positive int"),
        ({"crop": 8, "crop_pct": 0}, "'crop_pct' must be a number"),
        ({"crop": 8, "mean": 0.5}, "'mean' must be 3 finite numbers"),
        ({"crop": 8, "std": [0, 1, 1]}, "'std' must be 3 finite numbers > 0"),
        ({"crop": 8, "crop_mode": "zoom"}, "'crop_mode' must be one of"),
    ):
        (tmp / "plain.onnx.json").write_text(json.dumps(spec))
        for extra in ((), ("--crop", "8")):  # a broken sidecar is never masked by --crop
            res = runner.invoke(
                app,
                [
                    "extract",
                    str(tmp / "imgs"),
                    str(tmp / "plain.onnx"),
                    "-o",
                    str(tmp / "p.npz"),
                    "--device",
                    "cpu",
                    "--force",
                    *extra,
                ],
            )
            assert res.exit_code == 2 and needle in res.output, (spec, res.output)
            assert "plain.onnx.json" in res.output and "--crop must" not in res.output


@needs_timm
def test_preprocessing_matches_timms_eval_transform_in_every_crop_mode():
    """center / squash / border, square and non-square crops, odd images: the same bits
    as timm's own evaluation transform (timm's 'squash' models were squeezed into a
    centre crop, and non-square centre crops squashed, before)."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    rng = np.random.default_rng(42)
    cases = 0
    for hw in ((400, 200), (37, 91), (8, 8), (301, 299)):
        img = Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8))
        for size in (8, (8, 12), (12, 8)):
            for mode in ("center", "squash", "border"):
                for pct, interp in ((0.875, "bilinear"), (1.0, "bicubic"), (0.95, "bicubic")):
                    ref = transforms_imagenet_eval(
                        img_size=size, crop_pct=pct, crop_mode=mode, interpolation=interp
                    )(img).numpy()
                    spec = {
                        "crop": list(size) if isinstance(size, tuple) else size,
                        "crop_pct": pct,
                        "crop_mode": mode,
                        "interpolation": interp,
                    }
                    got = Preprocess.from_dict(spec, "test")(img)
                    np.testing.assert_array_equal(got, ref, err_msg=str((hw, size, mode, pct)))
                    cases += 1
    assert cases == 108


def test_onnx_external_data_is_hashed_into_the_weights_record(tmp_path):
    from onnx import external_data_helper

    h, w = 9, 11
    _make_model(tmp_path / "m.onnx", h, w)
    model = onnx.load(str(tmp_path / "m.onnx"))
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    _folder(tmp_path / "imgs", h, w)
    spec = {"crop": [h, w], "resize": [h, w]}
    (tmp_path / "m.onnx.json").write_text(json.dumps(spec))
    first = extract(tmp_path / "imgs", tmp_path / "m.onnx", tmp_path / "a.npz", device="cpu")
    raw = bytearray((tmp_path / "m.onnx.data").read_bytes())
    raw[:4] = np.float32(3.0).tobytes()  # other weights, the same .onnx file
    (tmp_path / "m.onnx.data").write_bytes(bytes(raw))
    second = extract(tmp_path / "imgs", tmp_path / "m.onnx", tmp_path / "b.npz", device="cpu")
    w1, w2 = first.metadata["weights"], second.metadata["weights"]
    assert w1["model_sha256"] == w2["model_sha256"] and w1["sha256"] != w2["sha256"]
    assert [os.path.basename(e["path"]) for e in w1["external_data"]] == ["m.onnx.data"]
    assert not np.array_equal(
        np.load(tmp_path / "a.npz")["features"], np.load(tmp_path / "b.npz")["features"]
    )


def test_an_output_sharing_the_stem_is_not_an_earlier_run(setup):
    tmp, _, _ = setup
    assert _cli_extract(tmp, tmp / "o" / "feats-20240101.npz").exit_code == 0
    other = {p.name: p.read_bytes() for p in (tmp / "o").iterdir()}
    res = _cli_extract(tmp, tmp / "o" / "feats.npz", "--shard-size", "5")
    assert res.exit_code == 0, res.output  # nothing of its own to replace: no --force
    res = _cli_extract(tmp, tmp / "o" / "feats.npz", "--force")
    assert res.exit_code == 0, res.output
    now = {p.name: p.read_bytes() for p in (tmp / "o").iterdir()}
    assert {k: now[k] for k in other} == other  # the dated output untouched
    assert sorted(set(now) - set(other)) == ["feats.json", "feats.npz"]  # shards replaced


def test_extract_from_a_thread_and_a_resize_pair_given_as_an_argument(setup):
    """The CLI runs off the main thread (no SIGTERM handler there); a resize pair given
    to extract() keeps its documented meaning (exactly that size), as in a sidecar."""
    import threading

    from dpfc_native.extract import _merged_preprocess

    tmp, _, _ = setup
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", _cli_extract(tmp, tmp / "t.npz")))
    thread.start()
    thread.join()
    assert out["r"].exit_code == 0, out["r"].output

    class NoSpec:
        def default_preprocess(self):
            from dpfc_native.extract import _NoPreprocess

            raise _NoPreprocess("no spec")

    pair = _merged_preprocess(NoSpec(), {"crop": [8, 8], "resize": [8, 8]})
    assert pair.crop_mode == Preprocess.from_dict({"crop": [8, 8], "resize": [8, 8]}, "s").crop_mode
    assert pair.crop_mode == "squash"
    assert _merged_preprocess(NoSpec(), {"crop": [8, 8], "resize": 9}).crop_mode == "center"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_device_named_like_an_image_is_a_bad_image(setup, fifo_alarm):
    tmp, _, _ = setup
    fifo = tmp / "imgs" / "bee" / "pipe.png"
    os.mkfifo(fifo)
    fifo_alarm.append(str(fifo))
    with pytest.raises(ExtractError, match="pipe.png.*not a regular file"):
        extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "f.npz", device="cpu")
    res = extract(tmp / "imgs", tmp / "tiny.onnx", tmp / "s.npz", device="cpu", on_error="skip")
    assert [s["path"] for s in res.skipped] == [str(fifo)]
    assert "FIFO" in res.skipped[0]["error"]
    assert data.load_features(res.files[0]).n == sum(COUNTS)
    # A CSV row naming a FIFO (through a link), a directory or a device: the same.
    link = tmp / "link.png"
    os.symlink(fifo, link)
    rows = [(str(link), "bee"), (str(tmp / "imgs"), "ant"), ("/dev/null", "cat")]
    rows.append((str(tmp / "imgs" / "cat" / "img00.png"), "cat"))
    with open(tmp / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    res = extract(tmp / "list.csv", tmp / "tiny.onnx", tmp / "c.npz", device="cpu", on_error="skip")
    kinds = [s["error"] for s in res.skipped]
    assert [s["path"] for s in res.skipped] == [r[0] for r in rows[:3]]
    assert "a FIFO" in kinds[0] and "a directory" in kinds[1]
    assert "a character device" in kinds[2] or not os.path.exists("/dev/null")
    assert data.load_features(res.files[0]).n == 1
    result = runner.invoke(
        app,
        ["extract", str(tmp / "imgs"), str(tmp / "tiny.onnx"), "-o", str(tmp / "cli.npz")]
        + ["--device", "cpu", "--skip-bad"],
    )
    assert result.exit_code == 0, result.output
    assert "pipe.png" in result.output
