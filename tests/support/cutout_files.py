"""Files and helpers the image, mask, cutout and colour tests share: PNG bytes from arrays, a
node's cached output from a finished job, and a tiny random-weight ONNX model in the I/O
layout of rembg's u2net (so RemoveBackground runs without downloading anything)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

U2NET_SIZE = 320


def write_tiny_u2net(
    path: Path, kernel: np.ndarray | None = None, seed: int = 0, input_name: str = "input.1", size: int = U2NET_SIZE
) -> Path:
    """A u2net-shaped ONNX model: by default input "input.1" [1,3,320,320] and a first output
    [1,1,320,320] = sigmoid(conv3x3(input)), then a second side output as u2net has. The
    1x3x3x3 kernel is random unless given; another input name or size imitates other model
    families. Built with onnx.helper, so no torch export is involved."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kernel is None:
        kernel = np.random.default_rng(seed).normal(0, 0.5, (1, 3, 3, 3))
    weight = numpy_helper.from_array(np.asarray(kernel, dtype=np.float32).reshape(1, 3, 3, 3), "w")
    bias = numpy_helper.from_array(np.zeros(1, dtype=np.float32), "b")
    nodes = [
        helper.make_node("Conv", [input_name, "w", "b"], ["logits"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["logits"], ["d0"]),
        helper.make_node("Sigmoid", ["d0"], ["d1"]),
    ]
    shape = [1, 1, size, size]
    graph = helper.make_graph(
        nodes,
        "tiny-u2net",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, size, size])],
        [
            helper.make_tensor_value_info("d0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("d1", TensorProto.FLOAT, shape),
        ],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
