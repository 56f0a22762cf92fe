"""Public images and a stand-in frozen model for the README's worked example.

Writes scikit-learn's bundled digits (1797 8x8 images, public, no download) as PNG files
in the class-per-subfolder layout, split like ``dpfc_native.data.digits_features``
(1347 train / 450 test, stratified, seed 0)::

    OUT/images/train/<digit>/<index>.png
    OUT/images/test/<digit>/<index>.png

and ``OUT/pixels.onnx``: a fixed "feature extractor" (grey level of each of the 64
pixels, in [0, 1]) with its preprocessing in the model's ``dpfc_preprocess`` metadata.
It stands in for a real pre-trained network exported to ONNX (e.g. with
``torch.onnx.export``), which is what a user passes to ``dpfc extract``.

Usage: ``python examples/worked_example_data.py OUT`` (needs the ``onnx`` package:
``pip install onnx``; Pillow comes with the ``[extract]`` extra).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def write_images(out: str) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    from dpfc_native import data

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    # The same stratified split as data.digits_features (row indices travel as features).
    index = data.FeatureSet(
        np.arange(labels.size, dtype=np.float64)[:, None].copy(), labels, 10, "digits"
    )
    train, test = data.train_test_split_features(index, data.DIGITS_TEST_SIZE, seed=0)
    for split, fs in (("train", train), ("test", test)):
        for i, y in zip(fs.features[:, 0].astype(int), fs.labels):
            folder = os.path.join(out, "images", split, str(y))
            os.makedirs(folder, exist_ok=True)
            grey = np.rint(bunch.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(grey).save(os.path.join(folder, f"{i:04d}.png"))


def write_model(path: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["image"], ["grey"], axes=[1], keepdims=0),
        helper.make_node("Flatten", ["grey"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pixels",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "dpfc_preprocess": json.dumps(
                {
                    "resize": 8,
                    "crop": [8, 8],
                    "mean": [0, 0, 0],
                    "std": [1, 1, 1],
                    "interpolation": "bilinear",
                }
            )
        },
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "work"
    write_images(out)
    write_model(os.path.join(out, "pixels.onnx"))
    print(f"wrote {out}/images/train, {out}/images/test and {out}/pixels.onnx")
