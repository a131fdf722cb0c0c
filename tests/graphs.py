"""Small ONNX graphs built in code for the unit tests (no files from outside the repo)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def init(self, base: str, arr: np.ndarray) -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (cin // group * k * k)), (cout, cin // group, k, k)).astype(np.float32)
        ins = [x, self.init("W", w)]
        if bias:
            ins.append(self.init("B", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride], group=group)

    def bn(self, x: str, c: int) -> str:
        g = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        b = self.rng.normal(0, 0.2, c).astype(np.float32)
        m = self.rng.normal(0, 0.2, c).astype(np.float32)
        v = self.rng.uniform(0.5, 2.0, c).astype(np.float32)
        return self.node("BatchNormalization", [x, self.init("g", g), self.init("b", b), self.init("m", m),
                                                self.init("v", v)], epsilon=1e-5)

    def model(self, x: str, y: str, shape: list, out_shape: list | None = None, opset: int = 13) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def resnet_like(seed: int = 0, classes: int = 10, width: int = 8, size: int = 16) -> onnx.ModelProto:
    """Conv-BN-ReLU stem, MaxPool, a residual block (Add of two quantized tensors), GAP, Flatten, Gemm."""
    b = Builder(seed)
    x = b.node("Relu", [b.bn(b.conv("input", 3, width, bias=False), width)])
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Relu", [b.bn(b.conv(x, width, width, bias=False), width)])
    y = b.bn(b.conv(y, width, width, bias=False), width)
    x = b.node("Relu", [b.node("Add", [y, x])])
    x = b.node("Relu", [b.conv(x, width, 2 * width, stride=2)])
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    w = b.rng.normal(0, 0.3, (classes, 2 * width)).astype(np.float32)
    b.node("Gemm", [x, b.init("fcW", w), b.init("fcB", np.zeros(classes, np.float32))], transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, size, size], ["N", classes])


def mobilenet_like(seed: int = 0) -> onnx.ModelProto:
    """Depthwise-separable blocks with Clip(0, 6), an inverted residual, GAP into a 1x1 Conv head."""
    b = Builder(seed)
    lo, hi = b.init("lo", np.array(0.0, np.float32)), b.init("hi", np.array(6.0, np.float32))
    x = b.node("Clip", [b.conv("input", 3, 16, stride=2), lo, hi])
    y = b.node("Clip", [b.conv(x, 16, 16, group=16), lo, hi])
    y = b.conv(y, 16, 16, k=1)
    x = b.node("Add", [x, y])
    x = b.node("Clip", [b.conv(x, 16, 32, k=1), lo, hi])
    x = b.node("GlobalAveragePool", [x])
    x = b.conv(x, 32, 10, k=1)
    b.node("Flatten", [x], axis=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, 16, 16], ["N", 10])


def strided_residual():
    """A stride-2 expand/depthwise/project block with asymmetric padding, then a residual block."""
    b = Builder(3)
    lo, hi = b.init("lo", np.array(0.0, np.float32)), b.init("hi", np.array(6.0, np.float32))
    x = b.node("Clip", [b.conv("input", 3, 8, k=3), lo, hi])
    y = b.node("Clip", [b.conv(x, 8, 16, k=1), lo, hi])
    y = b.node("Conv", [y, b.init("W", b.rng.normal(0, 0.4, (16, 1, 3, 3)).astype(np.float32))],
               kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2], group=16)
    y = b.node("Relu", [y])
    x = b.conv(y, 16, 8, k=1)
    z = b.node("Clip", [b.conv(x, 8, 16, k=1), lo, hi])
    z = b.node("Clip", [b.conv(z, 16, 16, k=5, group=16), lo, hi])
    z = b.conv(z, 16, 8, k=1)
    b.node("Add", [x, z])
    b.nodes[-1].output[0] = "out"
    return b.model("input", "out", ["N", 3, 15, 15], ["N", 8, 8, 8])


def inputs(n: int = 16, size: int = 16, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, 0.6, (n, 3, size, size)), -1, 1).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, {sess.get_inputs()[0].name: x})


def linear_stream(seed: int = 4) -> onnx.ModelProto:
    """A stage of two inverted residual blocks on a linear stream: a projection conv and two Add(stream, block)
    sums, read by the expansion convs and a Relu head."""
    b = Builder(seed)
    lo, hi = b.init("lo", np.array(0.0, np.float32)), b.init("hi", np.array(6.0, np.float32))
    x = b.node("Clip", [b.conv("input", 3, 8, k=3), lo, hi])
    x = b.conv(x, 8, 8, k=1)
    for _ in range(2):
        z = b.node("Clip", [b.conv(x, 8, 16, k=1), lo, hi])
        z = b.node("Clip", [b.conv(z, 16, 16, k=3, group=16), lo, hi])
        x = b.node("Add", [x, b.conv(z, 16, 8, k=1)])
    x = b.node("Relu", [b.conv(x, 8, 16, k=1)])
    x = b.node("GlobalAveragePool", [x])
    x = b.conv(x, 16, 10, k=1)
    b.node("Flatten", [x], axis=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, 16, 16], ["N", 10])


def branches(seed: int = 5) -> onnx.ModelProto:
    """Two parallel convs joined by a Concat (a run block reconstruction does not take), then an inverted
    residual-style expand/depthwise/project run and a 1x1 Conv head."""
    b = Builder(seed)
    lo, hi = b.init("lo", np.array(0.0, np.float32)), b.init("hi", np.array(6.0, np.float32))
    x = b.node("Clip", [b.conv("input", 3, 8), lo, hi])
    left = b.node("Clip", [b.conv(x, 8, 8, k=1), lo, hi])
    right = b.node("Clip", [b.conv(x, 8, 8), lo, hi])
    x = b.node("Concat", [left, right], axis=1)
    x = b.node("Clip", [b.conv(x, 16, 32, k=1), lo, hi])
    x = b.node("Clip", [b.conv(x, 32, 32, group=32), lo, hi])
    x = b.conv(x, 32, 16, k=1)
    x = b.node("GlobalAveragePool", [x])
    x = b.conv(x, 16, 10, k=1)
    b.node("Flatten", [x], axis=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, 16, 16], ["N", 10])
