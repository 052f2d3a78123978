"""A tiny ONNX classifier built with the ``onnx`` package (no downloads): scores
``[1 - mean, mean]`` of the input pixels, labels ``["dark", "bright"]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build(path: Path, h: int = 18, w: int = 32) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = 3 * h * w
    weights = np.stack([np.full(n, -1.0 / n), np.full(n, 1.0 / n)], axis=1).astype(np.float32)
    bias = np.array([1.0, 0.0], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["frame"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["scores"]),
        ],
        "brightness",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


SPEC = {"input": {"shape": [1, 3, 18, 32], "layout": "NCHW"}, "labels": ["dark", "bright"],
        "threshold": 0.6}  # fmt: skip
