"""Train the demo model (models/shapes_resnet.onnx) on generated shape images; needs torch (CPU is enough).

    pip install -e .[train]
    python models/train_shapes.py            # about 2 minutes on 2 cores, writes models/shapes_resnet.onnx

The network is a small ResNet: Conv-BN-ReLU stem, two residual blocks (Conv-BN-ReLU-Conv-BN + identity,
ReLU), MaxPool, a strided Conv-BN-ReLU, GlobalAveragePool and a Gemm head.  The ONNX file is written node by
node from the trained weights, so the BatchNormalization nodes stay in it (ptqc folds them itself).
Data: ``ptqc.demo.make_shapes`` with seed 0 (training); the demo calibrates on seed 1 and evaluates on seed 2.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ptqc.demo import CLASSES, make_shapes


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class ShapesResNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = len(CLASSES)):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.block1 = Block(width)
        self.down, self.down_bn = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.block2 = Block(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.block1(x)
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.down_bn(self.down(x)))
        x = self.block2(x)
        return self.fc(x.mean(dim=(2, 3)))


def export(model: ShapesResNet, path: str) -> None:
    """Write the network as plain ONNX ops, keeping BatchNormalization."""
    inits, nodes = [], []

    def param(name, tensor):
        inits.append(numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name))
        return name

    def conv_bn(prefix, conv, bn, x, relu=True):
        w = param(f"{prefix}.weight", conv.weight)
        nodes.append(helper.make_node("Conv", [x, w], [f"{prefix}_conv"], name=f"{prefix}_Conv",
                                      kernel_shape=list(conv.kernel_size), pads=[conv.padding[0]] * 4,
                                      strides=list(conv.stride)))
        ins = [f"{prefix}_conv"] + [param(f"{prefix}_bn.{k}", getattr(bn, a)) for k, a in
                                    (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))]
        nodes.append(helper.make_node("BatchNormalization", ins, [f"{prefix}_bn"], name=f"{prefix}_BN", epsilon=bn.eps))
        if not relu:
            return f"{prefix}_bn"
        nodes.append(helper.make_node("Relu", [f"{prefix}_bn"], [f"{prefix}_relu"], name=f"{prefix}_Relu"))
        return f"{prefix}_relu"

    def block(prefix, b, x):
        y = conv_bn(f"{prefix}.conv1", b.conv1, b.bn1, x)
        y = conv_bn(f"{prefix}.conv2", b.conv2, b.bn2, y, relu=False)
        nodes.append(helper.make_node("Add", [y, x], [f"{prefix}_add"], name=f"{prefix}_Add"))
        nodes.append(helper.make_node("Relu", [f"{prefix}_add"], [f"{prefix}_out"], name=f"{prefix}_Relu"))
        return f"{prefix}_out"

    x = conv_bn("stem", model.stem, model.stem_bn, "input")
    x = block("block1", model.block1, x)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="MaxPool", kernel_shape=[2, 2], strides=[2, 2]))
    x = conv_bn("down", model.down, model.down_bn, "pool")
    x = block("block2", model.block2, x)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="Flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["features", param("fc.weight", model.fc.weight), param("fc.bias", model.fc.bias)],
                                  ["logits"], name="fc_Gemm", transB=1))
    graph = helper.make_graph(
        nodes, "shapes_resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)])], inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ptqc-train")
    onnx_model.ir_version = 8
    onnx_model.doc_string = "ptqc demo: 10 procedurally drawn shape classes, 32x32 RGB, input pixel/127.5-1"
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "shapes_resnet.onnx"))
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = make_shapes(args.samples, seed=0)
    xv, yv = make_shapes(2000, seed=2)
    model = ShapesResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt) - 63, 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean() * 100
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out top-1 {acc:.2f}%")
    export(model, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
